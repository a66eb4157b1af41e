"""The data floor: environments in one step-row format, the C++ replay ring buffer's face, the collector, atomic
directories. Imports neither torch nor the model stack."""
