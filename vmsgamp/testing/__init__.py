"""Helpers for tests of vmsgamp and of code built on it.

Oracles (pure Python, written from the layouts and the virtio text, sharing
no code with the compiled engine; run one beside the real thing and compare):

  fifo_model    the AMP message FIFOs (Gen B and Gen A layouts): PyFifoPeer
                is one side of a FIFO pair, with poke_* for hostile peers
  virtq_model   split and packed virtqueues, driver and device side

Built on them:

  virtq_mock    MockDriver (writes chains into real ring memory, as a virtio
                driver would) for device-model tests; MockDevice for
                driver-side tests
"""
