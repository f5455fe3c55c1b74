"""``clipcap evaluate`` (captions against references) and ``clipcap study decoding``."""
