"""edgevit-fleet: staged engine rollouts across many devices over MQTT (operator side; never imports JAX)."""
