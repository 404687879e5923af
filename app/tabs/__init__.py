"""One builder per tab: each creates its components and the events inside the tab, and returns
the components other tabs or ``app.main`` wire together."""
