"""Federated learning for Portico: the site side of an NVFlare federation.

Enrolment (startup kits, distributed provisioning), the site policy Portico writes (deny by default),
the supervisor of the NVFlare client process, the local cohort, the pre-installed trainer and the
export of a global model to a candidate model package. Imports only :mod:`inference` from the project.
"""
