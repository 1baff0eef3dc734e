"""Ways of sending a discovered session to XNAT: REST import and DICOM C-STORE."""
