"""Built-in kpt plugins (installed as ``kpt_plugins``); written exactly as a third-party plugin would be."""
