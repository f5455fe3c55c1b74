"""The embedded-default end-to-end run (``clipcap demo``) and its steps.

``run`` the step list and ``run_demo``; ``train``, ``caption``, ``decap`` its steps;
``synthetic_tables`` attribute-labelled embedding tables for tests and benchmarks.
"""
