from lfr.audit.service import AuditService
from lfr.runtime.service import main

main(AuditService)
