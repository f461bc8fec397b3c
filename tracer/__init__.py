"""Build-time tracer: records a function start-up and writes a function template."""
