"""Margin heads (AdaFace, ArcFace, CosFace, KappaFace) and the sharded PartialFC classifier."""
