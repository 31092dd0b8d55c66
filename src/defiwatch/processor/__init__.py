"""Processor: change_log -> change detection and enrichment -> event stream and hot cache."""

from defiwatch.processor.fill import CacheFiller
from defiwatch.processor.processor import Processor
from defiwatch.processor.wakeup import Wakeup, listen_postgres

__all__ = ["CacheFiller", "Processor", "Wakeup", "listen_postgres"]
