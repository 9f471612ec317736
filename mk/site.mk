# Instructor mode (scripts/build_slides.py, scripts/build_site.py; both read committed outputs)
# make slides      : one reveal.js deck per notebook, build/slides/NAME.slides.html, offline
# make site        : the course site, build/site/index.html: pages, figures, derivation handout
# make handout     : the same build; the print-ready handout is build/site/handout.html
# make screenshots : the browser test, writing figures/slides_nbNN.png and figures/site_home.png
.PHONY: slides site handout screenshots

slides: $(SITE_STAMP)
	$(PY) scripts/build_slides.py --out build/slides

site: $(SITE_STAMP)
	$(PY) scripts/build_site.py --out build/site

handout: site
	@echo "Print build/site/handout.html from a browser (laid out for A4)."

screenshots: $(SITE_STAMP)
	DPO_COURSE_SCREENSHOTS=$(CURDIR)/figures DPO_COURSE_REQUIRE_BROWSER=1 \
	  $(PY) -m pytest -q tests/test_browser.py
