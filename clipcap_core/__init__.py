"""clipcap_core: pure PyTorch + tokenizer code for CLIP-prefix captioning (ClipCap, DeCap). No Ray imports.
Import a name from the module that defines it (``from clipcap_core.captioner import Captioner``).
"""

__version__ = "0.1.0"
