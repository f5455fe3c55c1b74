"""The embedded-default end-to-end run (``clipcap demo``) and its steps."""
