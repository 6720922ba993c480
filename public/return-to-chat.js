// After logging in, back to the chat whose address was opened.
//
// Chainlit 2.12's web app, opened at a chat's address (/thread/<id>) without a session, reloads itself
// at /login, and after the login always goes to "/": a new, empty chat. This script (loaded before the
// app through `custom_js` in .chainlit/config.toml) remembers the chat's address for this tab, and when
// the app leaves /login for "/", opens that chat instead. Same origin only: it only ever goes to a
// path of this app.
(function () {
  var KEY = 'babl-return-to';
  var path = window.location.pathname;
  if (/^\/thread\/[A-Za-z0-9-]+$/.test(path)) {
    window.sessionStorage.setItem(KEY, path);
    return;
  }
  if (path !== '/login') {
    window.sessionStorage.removeItem(KEY);
    return;
  }
  ['pushState', 'replaceState'].forEach(function (name) {
    var original = window.history[name];
    window.history[name] = function (state, title, url) {
      var target = window.sessionStorage.getItem(KEY);
      var leavingLogin = window.location.pathname === '/login';
      var result = original.apply(this, arguments);
      if (target && leavingLogin && url !== undefined && new URL(url, window.location.href).pathname === '/') {
        window.sessionStorage.removeItem(KEY);
        window.location.replace(target);
      }
      return result;
    };
  });
})();
