"""TEMPORARY (removed before this change lands): the old import path, kept while another
engineer's long-running script still imports it."""

from .engine.pipelines import *  # noqa: F401,F403
from .engine.pipelines import DEMO_MODEL_DIR, load_text_to_image  # noqa: F401
from .testing.pipelines import *  # noqa: F401,F403
