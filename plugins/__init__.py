"""Built-in visadapt plugins, one module per method (installed as ``visadapt.plugins``)."""
