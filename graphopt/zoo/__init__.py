"""Models and data by name: model specs (:mod:`.models`: ``digits:vgg``, ``torchvision:NAME``,
``file.py:factory``, ``.pt`` files), data sets (:mod:`.datasets`: ``digits``, ``.pt``/``.npz``
files, image folders, factories) and the bundled digits model and data (:mod:`.digits`).
"""
