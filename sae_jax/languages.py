"""The language codes every token carries (the one place they are defined).

A token's code comes from its document's ``language`` metadata or, in the toy world, from the
token's own ground truth. The analysis counts firings per code; its labels (``en``, ``ja``,
``bilingual``) are read from the ``EN`` and ``JA`` rows.
"""

LANGUAGE_CODES: dict[str, int] = {"en": 0, "ja": 1, "parallel": 2, "shared": 3, "special": 4}
EN, JA, SPECIAL = LANGUAGE_CODES["en"], LANGUAGE_CODES["ja"], LANGUAGE_CODES["special"]
N_LANGUAGE_CODES = len(LANGUAGE_CODES)
UNKNOWN = -1  # a document without (known) language metadata
