// MathJax 3 for the decks, the course pages and the handout. Loaded before tex-svg-full.js.
// SVG output: it needs no web fonts, which a page opened from disk (file://) may not load.
// The full TeX component and no menu: nothing is fetched after start-up.
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    // An unknown macro is an error (shown, and caught by tests/test_browser.py), not red text.
    packages: { "[-]": ["noundefined"] },
  },
  svg: { fontCache: "global" },
  options: { enableMenu: false },
  startup: {
    // Tests and the slide script wait for this flag: every formula on the page is typeset.
    pageReady() {
      return MathJax.startup.defaultPageReady().then(() => {
        document.documentElement.dataset.mathjax = "done";
      });
    },
  },
};
