"""Making datasets in the unified entity space (paper section IV-A, UMES): importers, the synthetic
generator, splits and filters, ``unimatch data describe``.

They write the dataset format of ``contracts.dataset`` (schema in ``contracts.schema``); numpy and
pydantic only.
"""

from typing import Literal

# `unimatch data synth --preset`: the synthetic sizes (model.data.synth.PRESETS holds their configs).
SynthPreset = Literal["tiny", "small", "100k", "1m"]
# `unimatch data import SOURCE`: the real catalogues that have an importer of their own.
ImportSource = Literal["amazon-phone-electronic", "amazon-sport-cloth", "movielens-100k", "movielens-1m"]
