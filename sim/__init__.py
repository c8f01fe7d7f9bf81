"""A DECTRIS detector simulator: SIMPLON REST API plus stream v1/v2 senders.

Independent of ``tango_dectris_live`` by design (a bug cannot hide by being made twice); both are
held against the real captures in ``../shared/testdata``.
"""
