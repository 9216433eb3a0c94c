"""The fleet's side of the device: the MQTT link, commands and their signatures, the outbox."""
