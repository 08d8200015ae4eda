"""``sslctl report``: a run's curves (report.png), tables (report.md) and numbers (report.json).

``runs`` reads run directories and evaluation results (no torch), ``plot`` draws the picture
(matplotlib, the optional ``sslctl[plot]`` extra), ``text`` writes the Markdown.
"""
