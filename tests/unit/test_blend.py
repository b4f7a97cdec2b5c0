"""A data path as one dataset or a Megatron blend 'W1 P1 W2 P2 ...' (megatron_patch/data/blend.py): what is read
as a blend, and the refusals of what cannot be one."""

from __future__ import annotations

import pytest

from megatron_patch.data.blend import Blend, read_blend, split_data_path
from megatron_patch.errors import UserError


@pytest.mark.parametrize("text, blend", [
    ("/data/a_text_document", Blend(("/data/a_text_document",), None)),
    ("/mnt/my corpus/a_text_document", Blend(("/mnt/my corpus/a_text_document",), None)),  # spaces, no number
    ("0.7 /data/a 0.3 /data/b", Blend(("/data/a", "/data/b"), (0.7, 0.3))),
    ("  3 /data/a\n1e-1 /data/b ", Blend(("/data/a", "/data/b"), (3.0, 0.1))),
    ("1 /data/only", Blend(("/data/only",), (1.0,))),
])
def test_what_is_read_as_a_blend(text, blend):
    assert read_blend("DATASET_PATH", split_data_path(text)) == blend


@pytest.mark.parametrize("text, message", [
    ("0.7 /data/a -0.3 /data/b", "DATASET_PATH: the weight '-0.3' of /data/b must be a positive number; a blend is "
                                 "'W1 P1 W2 P2 ...' (a positive weight before each path)."),
    ("0 /data/a 1 /data/b", "DATASET_PATH: the weight '0' of /data/a must be a positive number"),
    ("nan /data/a 1 /data/b", "DATASET_PATH: the weight 'nan' of /data/a must be a positive number"),
    ("inf /data/a 1 /data/b", "DATASET_PATH: the weight 'inf' of /data/a must be a positive number"),
    ("0.7 /data/a /data/b", "DATASET_PATH '0.7 /data/a /data/b' has 3 words: neither one path nor a blend "
                            "'W1 P1 W2 P2 ...'"),
    ("/data/a 0.7 /data/b 0.3", "DATASET_PATH '/data/a 0.7 /data/b 0.3': word 1 '/data/a' is out of place in a blend"),
    ("0.7 0.3 /data/a /data/b", "word 2 '0.3' is out of place in a blend"),
])
def test_a_bad_blend_is_refused_naming_the_word(text, message):
    with pytest.raises(UserError) as err:
        read_blend("DATASET_PATH", split_data_path(text))
    assert str(err.value).startswith("error: ") and message in str(err.value)
