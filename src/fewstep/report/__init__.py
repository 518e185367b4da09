"""Pictures (sample grids, 2-D scatter plots, curves) and Markdown/HTML reports."""
