"""``python -m equss``: what was built and which backend runs where (:func:`equss.backends.describe`)."""

from equss.backends import describe

print(describe())
