"""Reports: the audit and finished runs as one self-contained HTML page and a Markdown twin.

``run_folders`` reads run folders, ``plots`` draws PNGs, ``document`` is the page as
data, ``html`` and ``markdown`` render it, ``audit_section`` and ``run_sections`` fill
it, ``build`` writes the files. Nothing is imported here, so that the audit can use
the leaf modules without importing the report builders that use the audit.
"""
