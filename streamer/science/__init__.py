"""The science core: preprocessing, the network, checkpoints, batched inference, the taxonomy.

Pure: no Kafka, no SQL."""
