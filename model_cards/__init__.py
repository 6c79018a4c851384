"""Model-card templates, installed as the package data of ``timm_stream.model_cards``.

The directory lives at the top of the repository (``model_cards/``) and is mapped onto the
subpackage by ``[tool.setuptools.package-dir]``, so that ``importlib.resources`` finds the templates
in an editable install and in a wheel alike (see :func:`timm_stream.hub.render_model_card`).
"""
