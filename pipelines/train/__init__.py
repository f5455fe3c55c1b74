"""ClipCap training with Ray Train, and what is built on it: nightly retraining, the prefix sweep."""
