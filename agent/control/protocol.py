"""The version of the MQTT contract between agents and fleet tools (docs/mqtt.md, CHANGELOG.md).

Devices in the field are updated in waves, so a controller always meets agents of the previous
version: a change that an older peer would misread gets a new number here and an entry in the
changelog, and the fleet reads every version from 1 on. Version 1 statuses carry no number.
"""

PROTOCOL_VERSION = 2
