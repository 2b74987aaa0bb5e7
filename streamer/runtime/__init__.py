"""The daemon: Kafka clients, the consume -> execute -> produce loop, PostgreSQL, metrics and health, logs."""
