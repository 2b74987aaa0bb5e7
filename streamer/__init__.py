"""SpectraNet Stream: classify transient spectra as they arrive on Kafka.

The daemon polls Avro spectrum packets, preprocesses them onto the model grid, classifies micro-batches with
SpectraNet, writes results to a database and publishes annotated packets, and only then advances offsets.
"""

__version__ = "0.2.0"
