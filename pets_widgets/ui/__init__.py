"""The user interface: ipywidgets, forms, rendering, the epsilon explorer, plots, presets and
the Voila server. Thin layers over headless functions; nothing else in pets_widgets imports it."""
