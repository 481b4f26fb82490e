"""Datasets: the on-disk format, the shapes generator, readers, importer, validation, DVC versioning, detector.

See docs/data.md. Submodules are imported on use (`from kelix.data.reader import load_images`), so importing
the package stays cheap: validation pulls in Great Expectations and versioning runs DVC only when called.
"""
