"""The OpenAI-compatible HTTP frontend (--http-port): a thin adapter over the engine API, as
service.py is for gRPC. app.py routes and serves, schemas.py turns request bodies into
GenerateRequests, responses.py writes OpenAI's objects and stream chunks, errors.py its error
objects."""
