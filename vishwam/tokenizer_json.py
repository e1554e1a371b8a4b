"""Deprecated: use `vishwam.tokenizer` (`JsonTokenizer` lives in `vishwam.tokenizer.json_backend`)."""

import warnings

from .tokenizer import IdArray as IdArray
from .tokenizer import TokenizerBase as TokenizerBase
from .tokenizer import pretrained_settings as pretrained_settings
from .tokenizer import write_tokenizer_files as write_tokenizer_files
from .tokenizer.json_backend import TOKENIZER_FILE as TOKENIZER_FILE
from .tokenizer.json_backend import JsonTokenizer as JsonTokenizer

warnings.warn(
    "vishwam.tokenizer_json is deprecated; import JsonTokenizer and TOKENIZER_FILE from vishwam.tokenizer.",
    DeprecationWarning,
    stacklevel=2,
)
