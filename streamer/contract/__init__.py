"""The input and output contract: Avro codec, packet rules, spectrum-file readers, the annotated record.

Imports only science."""
