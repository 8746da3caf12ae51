"""The domain: what the service's data and refusals are, with no I/O and no framework.

Claims and exercise, the pose and media batch codecs, pseudonymisation, and the
exception tree. Nothing here imports another package of the project; every other
layer imports this one (see ``docs/architecture.md``).
"""
