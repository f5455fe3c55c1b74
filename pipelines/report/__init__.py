"""``clipcap report``: one self-contained HTML page about a captioning run (gallery of a bounded sample with
captions, references and scores; metric table; training curves; prefix interpretation; model card).
"""
