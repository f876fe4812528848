"""Layers and models: the ``Model`` base class and ``ParamSpec`` (``model``), the ``Plan``/``Point``
protocol between a forward pass and the rules (``plan``), functional layers (``layers``, ``conv``,
``units``), and the models (``mlp``, ``localmixer``, ``cnn``, ``resnet``, with ``aux_heads``)."""
