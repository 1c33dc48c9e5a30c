"""Models and data by name: model specs (:mod:`.models`: ``digits:vgg``, ``torchvision:NAME``,
``file.py:factory``, ``.pt`` files) and the bundled digits model and data set (:mod:`.digits`).
"""
