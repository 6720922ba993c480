// Babl's additions to Chainlit 2.12's chat page (loaded by `custom_js` in .chainlit/config.toml).
//
// Chainlit's front end is a compiled bundle, so two behaviours it lacks are added here, from the
// outside, on elements it renders:
//
// 1. Model dropdown: Chainlit's Select has no disabled entries. An entry that cannot be used on this
//    machine has a two-line label (babl_core/web/ui.py: model_choices): its name, then
//    "<availability word>: <reason>". Those entries are marked disabled (greyed by babl.css, not
//    selectable by mouse or keyboard); picking one anyway still gets a message saying why.
// 2. Commands: typing `/status` and Enter runs the command. Chainlit's first Enter only turns the
//    typed name into a command chip; when the typed text is exactly a command's name, the message is
//    then sent as if Enter had been pressed a second time.
// 3. After a login, back to the chat whose address was opened (the first function below):
//    Chainlit 2.12's web app, opened at a chat's address (/thread/<id>) without a session, reloads itself
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

(function () {
  'use strict';

  // Keep in step with AVAILABILITY_WORDS in babl_core/catalog.py (the words that are not servable).
  var UNUSABLE = /\n(needs-training|unavailable): /;

  function markUnusable(option) {
    if (option.dataset.bablChecked === option.textContent) return;
    option.dataset.bablChecked = option.textContent;
    var match = UNUSABLE.exec(option.textContent || '');
    if (!match) {
      option.removeAttribute('data-babl-unusable');
      return;
    }
    option.setAttribute('data-babl-unusable', match[1]);
    option.setAttribute('aria-disabled', 'true');
    option.setAttribute('title', 'Cannot be used on this machine: ' + option.textContent.split('\n').slice(1).join(' '));
  }

  function refuse(event) {
    var option = event.target && event.target.closest && event.target.closest('[data-babl-unusable]');
    if (!option) return;
    if (event.type === 'keydown' && event.key !== 'Enter' && event.key !== ' ') return;
    event.preventDefault();
    event.stopPropagation();
  }
  // Capture phase on the window: runs before React's own handlers, which select the entry.
  ['pointerdown', 'pointerup', 'mouseup', 'click', 'keydown'].forEach(function (type) {
    window.addEventListener(type, refuse, true);
  });

  new MutationObserver(function () {
    document.querySelectorAll('[role="option"]').forEach(markUnusable);
  }).observe(document.documentElement, { childList: true, subtree: true, characterData: true });

  window.addEventListener(
    'keydown',
    function (event) {
      var input = event.target;
      if (!input || input.id !== 'chat-input' || event.key !== 'Enter' || event.shiftKey || event.isComposing) {
        return;
      }
      var typed = (input.value || '').trim().toLowerCase();
      if (!/^\/[\w-]+$/.test(typed)) return;
      var names = Array.prototype.map.call(document.querySelectorAll('.command-item .font-medium'), function (el) {
        return (el.textContent || '').trim().toLowerCase();
      });
      if (names.indexOf(typed.slice(1)) < 0) return;
      // Chainlit's handler (after this one) turns the text into the command chip; send it once the
      // send button is enabled again. Still disabled after a moment (an answer is running, when
      // Chainlit sends nothing either): the chip stays, and the next Enter sends it.
      var tries = 0;
      var send = function () {
        var submit = document.getElementById('chat-submit');
        if (submit && !submit.disabled && !(document.getElementById('chat-input').value || '').trim()) {
          submit.click();
        } else if (++tries < 40) {
          setTimeout(send, 50);
        }
      };
      setTimeout(send, 0);
    },
    true
  );
})();
