"""Host B: engine, block map, gate, status, receive and the plugin."""
