"""kpt: keypoint-conditioned vision transformers (KP-RPE) with domain plugins."""

__version__ = "0.1.0"
