"""Co-processors served by the C device kit (``csrc/kit``).

* :mod:`vmsgamp.coproc.build` -- build the Cortex-M4 firmware and host programs;
* :mod:`vmsgamp.coproc.m4` -- run the firmware on QEMU's mps2-an386 with its
  shared RAM in a host file (:class:`M4Machine`);
* :mod:`vmsgamp.coproc.emulate` -- ``vmsgamp emulate --coprocessor m4``.

The driver side talks to the firmware through the ``copro:`` region URI
(:mod:`vmsgamp.carriers.copro`).
"""
from vmsgamp.coproc.build import Firmware, build_firmware, missing_tools
from vmsgamp.coproc.m4 import DRIVER_MEMORY_OFFSET, PSRAM_BASE, M4Error, M4Machine

__all__ = ["DRIVER_MEMORY_OFFSET", "Firmware", "M4Error", "M4Machine", "PSRAM_BASE", "build_firmware",
           "missing_tools"]
