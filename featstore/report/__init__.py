"""Tables and plots from result rows, and the published reference numbers."""
