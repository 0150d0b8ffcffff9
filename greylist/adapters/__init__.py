"""Protocol adapters: each translates one protocol into a Connection for the service
and its Outcome back into replies (UCSPI, qmail-spp, Postfix policy delegation).
"""
