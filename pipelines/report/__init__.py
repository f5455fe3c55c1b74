"""``clipcap report``: one self-contained HTML page about a captioning run (gallery of a bounded sample with
captions, references and scores; metric table; training curves; prefix interpretation; model card).

- ``sample``: bounded reads of caption tables, the images behind them and per-image evaluation rows.
- ``charts``: matplotlib charts as data URIs. ``page``: the Jinja2 template (autoescaped).
- ``build``: ``ReportConfig`` and ``build_report``.
"""
