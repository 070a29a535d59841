#!/usr/bin/env bash
# The guest builder ships inside the package (vmsgamp/testing/guest/) so that
# an installed vmsgamp can build its test guest too; this is the same script.
exec bash "$(dirname "$0")/../../vmsgamp/testing/guest/build-guest.sh" "$@"
