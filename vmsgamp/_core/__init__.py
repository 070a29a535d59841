"""Compiled mechanism: regions, FIFOs, virtqueues, doorbells.  Imports nothing
from vmsgamp.protocol."""
